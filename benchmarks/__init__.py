"""The library's benchmarks, one module each, run from the repository root as ``python -m benchmarks.<name>`` (the
Makefile's ``bench``, ``bench-data``, ``gpu-check``, ``faults`` and ``transfer`` targets). Modules share code by
importing each other as ``benchmarks.<name>``: ``cost`` holds the settings, the step runner and the device options."""
