"""Run safety: what keeps a run from hanging silently, exiting 0 after a failure, or two runs from
sharing a checkpoint folder. `lock` (one run per checkpoint folder) and `run_dir` (rank 0's claim
on it, made in preflight), `signals` (SIGTERM/SIGINT/SIGUSR1 to a checkpoint and exit 75, the
launcher's children), `watchdog` (no step within train.watchdog_timeout: stacks, exit 4),
`nonfinite` (the policy for non-finite losses and gradients, exit 3), `exits` (the exit statuses
and RunStopped), and `guard` (RunSafety: the trainer's one call per step into all of it).
docs/reliability.md has the table of failures and what each does.
"""
