"""What every package may use and nothing in it imports back: strict configs (`config`), seeded
generators that make weights independent of the parallel layout (`seeding`), atomic writes
(`atomic`), the CPUs a process may use (`cpus`) and the peak tensor memory of a call
(`tensor_memory`)."""
