"""MONAI Label entry point of the pathology app; everything lives in the installed ``pathology`` package."""

from monailabel.interfaces.app import MONAILabelApp

from pathology.app import PathologyApp


class MyApp(PathologyApp, MONAILabelApp):
    """The class ``monailabel start_server --app apps/pathology`` instantiates: MONAI Label picks the class
    of ``main.py`` that names ``MONAILabelApp`` among its direct bases (already a base of ``PathologyApp``)."""
