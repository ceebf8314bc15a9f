"""Pipeline stages. Each module's ``run(params, …, out)`` is the only implementation of that stage; the
CLI, the DVC stages and the KFP components all call it."""
