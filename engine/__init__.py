"""Pipeline orchestration and the ``locore`` command line."""
