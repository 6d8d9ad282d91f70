"""Ray Tune sweeps of meta-training.

- :mod:`.space`: the ``sweep:`` recipe section, its format and the validated spec (no Ray dependency);
- :mod:`.recipe`: reading a sweep recipe (validation only: no model is loaded);
- :mod:`.portfolio`: the transfer recommender's ranked initial points, resolved before Tune starts;
- :mod:`.trial`: one trial, a meta-training run launched like ``jobs.meta_train`` under the sweep's run;
- :mod:`.sweep`: the driver (Ray Tune, ASHA on the meta-validation loss, MLflow parent/child runs,
  registration of the best trial and champion promotion); :mod:`.plot`: its summary plot.
"""
