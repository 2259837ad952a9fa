"""Training glue: the integrator, the Trainer callback and subclass, checkpoint markers."""
