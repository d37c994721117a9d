"""DOSnet-BV, the model side: DOSnet trained on bond valence data (``python train.py``).

One module per concern:

- ``params``: the rules of params.json and its one check (``load_params``, ``validate_params``).
- ``data``: the h5 as training reads it (``load_data`` -> ``Dataset``; layout: ``data_prep.h5schema``).
- ``scalers``: standardisation fitted on training rows (``Scaler``, ``Scalers``, ``model_inputs``).
- ``fit``: the training loop (compile, callbacks, early stopping, schedules; ``fit_predict`` -> ``FitResult``).
- ``metrics``: scores and the summary table.
- ``outputs``: the run folder's files and figures (``Log``, ``pyplot``, ``write_*``, ``plot_*``).
- ``runs``: single run, cross-validation, predictions and feature importance of a saved run.
- ``ablation``, ``learning_curve``: the two studies over baselines and DOSnet variants.
- ``streaming``, ``distribute``: files larger than memory (tf.data) and several devices.
- ``importance``, ``baselines``, ``descriptors``, ``report``: the generic parts of the studies.
- ``cli``: train.py's one-line errors.

The network itself is the root ``net.py`` (derived from ``DOSnet/net.py`` by ``patches/``).
"""
