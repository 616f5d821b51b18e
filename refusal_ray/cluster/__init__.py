"""Ray execution: the ModelWorker actor and the driver that schedules cells onto it."""
