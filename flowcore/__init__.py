"""flowcore: the shared, pure flow-matching math of trajflow (no Ray, no object storage).

Modules: ``schedules`` (sigma grids, few_step_sigmas, window stages), ``solvers`` (Euler/Heun with
trajectory capture), ``losses`` (window targets, aligned v-prediction), ``guidance`` (CFG),
``teacher`` (the Teacher protocol), ``gmm`` (analytic GMM teacher), ``flownets`` (small flow nets),
``diffusers_teacher`` / ``diffusers_scheduler`` (diffusers adapters), ``teacher_spec`` (SPEC strings).
"""
