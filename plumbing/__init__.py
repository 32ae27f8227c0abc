"""Plumbing: what every script needs and no reader of the algorithms has to open: the command line,
run folders and the run lifecycle around each trainer's epoch with its evaluation, processes,
precision, compiling, dashboards, hub access and image grids."""
