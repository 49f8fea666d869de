"""Training: the phase interface, one iteration (:class:`~pipeline.train.stepper.PhaseStepper`),
checkpoints, the Ray Train worker loop and driver, the phases (HiFiC, PLVC) and the stages' glue."""
