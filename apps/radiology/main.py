"""MONAI Label entry point of the radiology app; everything lives in the installed ``radiology`` package."""

from monailabel.interfaces.app import MONAILabelApp

from radiology.app import RadiologyApp


class MyApp(RadiologyApp, MONAILabelApp):
    """The class ``monailabel start_server --app apps/radiology`` instantiates: MONAI Label picks the class
    of ``main.py`` that names ``MONAILabelApp`` among its direct bases (already a base of ``RadiologyApp``)."""
