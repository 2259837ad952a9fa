"""Pure mathematics of TDLRT: Tucker algebra, geometry, Adam moments and the step engine (torch only, no PEFT)."""
