"""What every package may use and nothing in it imports back: strict configs (`config`), seeded
generators that make weights independent of the parallel layout (`seeding`), atomic writes
(`atomic`) and the CPUs a process may use (`cpus`)."""
