"""minti's version, in one place: `minti.__version__`, `python -m minti --version`, the run folder's
config.json and the wheel's metadata (setup.py reads this file) all take it from here."""
__version__ = "0.1.0"
