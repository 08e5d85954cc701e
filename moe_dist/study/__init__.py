"""The routing study (tools/routing_study.py, docs/routing_study.md): one file per experiment
(common_mode, digits_gates, comet_width, language_model), the task pool that runs them, the
statistics over seeds, the claim checks, the figures and the generated report."""
