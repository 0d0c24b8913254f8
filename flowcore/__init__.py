"""flowcore: the pure flow-matching math of trajflow (torch and numpy only: no files, no diffusers,
transformers, peft, safetensors or PIL, no Ray, no object storage).

Modules: ``schedules`` (sigma grids, few_step_sigmas, window stages), ``solvers`` (Euler/Heun with
trajectory capture, and ``euler_walk``, every few-step Euler walk of a student), ``losses`` (window
targets, aligned v-prediction), ``guidance`` (CFG), ``windows`` (window draws for progressive reflow),
``ota`` (window starts on the teacher's ODE), ``adversarial`` (discriminator losses and the student's
step walk), ``rollout`` (teacher rollouts and the RolloutTeacher protocol), ``metrics`` (coupling
error, sliced Wasserstein), ``vp_flow`` (the VP <-> rectified-flow conversion), ``teacher`` (the
Teacher protocol and fingerprints) and ``tensors`` (``expand_like``: a [B] tensor shaped to broadcast
against a batch). The network families live in ``models``.
"""
