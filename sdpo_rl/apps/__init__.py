"""What the `sdpo-rl` command, the demo, the examples and the benchmarks use, apart from the library: the demo's
training run (`demo`), its plot (`plotting`) and memory release (`cpu_memory`), and the small verifiable tasks they
train on (`tasks`). Nothing in the library (the trainer, `preflight`, `solve`) imports this package.
"""
