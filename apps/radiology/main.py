"""MONAI Label entry point of the radiology app; everything lives in the installed ``radiology`` package."""

from radiology.app import RadiologyApp


class MyApp(RadiologyApp):
    """The class ``monailabel start_server --app apps/radiology`` instantiates."""
