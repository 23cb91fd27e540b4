"""MONAI Label entry point of the pathology app; everything lives in the installed ``pathology`` package."""

from pathology.app import PathologyApp


class MyApp(PathologyApp):
    """The class ``monailabel start_server --app apps/pathology`` instantiates."""
