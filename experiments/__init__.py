"""The experiment engine behind cli.py: MNIST runs of the optimizers in the
registry, their run directories, seed statistics, reports and benchmarks.

One module per responsibility: `config` (run settings and their defaults),
`registry` (the optimizers), `data` (MNIST), `loop` (the one training loop),
`runs` (run directories, logs, checkpoints), `aggregate` (seed statistics and
tables), `studies` (compare and reproduce), `bench`, `quantization`. The
`lamb16` library never imports this package.
"""
