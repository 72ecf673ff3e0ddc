"""``python -m cblr_ext.gpu_check OUT_DIR``: on a GPU machine, build the extensions for
the GPU that is present, run every GPU test and the GPU bench, each stage in a
subprocess under its own time limit, and write the results (JSON, Markdown, pytest
junit XML, logs) into OUT_DIR; without a GPU, a dry run of the same plumbing.

``stages.py`` is the table of stages and their limits (docs/gpu_check.md repeats it),
``runner.py`` runs one stage, ``report.py`` writes the files and the verdict,
``probe.py`` reads the machine and the build.  Needs a source checkout (tests/, bench/)
and downloads nothing.
"""
