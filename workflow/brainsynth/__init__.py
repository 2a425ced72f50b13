"""brainsynth: the logic behind the brainSPADE-style synthesis workflow.

Rule scripts under ``workflow/scripts`` stay thin and call into this package so
that everything the tests need is importable without Snakemake.
"""

__version__ = "0.1.0"
