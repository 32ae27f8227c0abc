"""Experiments and measurement: the baseline-against-exploring comparison and its statistics, the
evaluation of a model on a prompt set, the benchmark (where the time goes) and the GPU memory
estimates. Run them from the repository root as `python -m experiments.<tool>`."""
