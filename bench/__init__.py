"""icl_scale's benchmarks (not part of the installed package): `python bench/run.py` is what
`make bench` runs (see bench/README.md). Its modules: common (data folder, machine info, timing),
scoring, importance, induction (the three sections) and report (results.json / results.md).
gpu_check.py and compare_stores.py are standalone scripts."""
