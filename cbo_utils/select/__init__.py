"""Selection methods: baselines, SWM, the CBO variants and the method registry."""
