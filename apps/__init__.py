"""The top floor: commands people run (``esc-deploy``, the quickstart).

Apps may import every floor below (models, runtimes, export, validation); nothing in the
library imports from here, so a library user never pays for the command-line layer.
"""
