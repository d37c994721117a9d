"""DOSnet (Fung et al., Nat. Commun. 12, 88 (2021)), reimplemented on Keras 3 from its published
specification, kept faithful to upstream's ``Main.py`` so it can be read beside the paper.

Modules: ``net`` (the network), ``params.json`` (upstream's defaults), ``protocol`` / ``__main__``
(``python -m DOSnet``: upstream's train/test and 5-fold CV protocol), ``compare`` +
``published_adsorption.json`` (the published figures), ``synthetic`` / ``demo`` (a smoke run).
This package imports nothing of the rest of the project (tests/test_layout.py checks it).

How the flags map (upstream ``Main.py`` -> ``python -m DOSnet`` -> root ``train.py``):

=====================  ==============================================  ==========================================  ==================================================
upstream flag          upstream behaviour                              ``python -m DOSnet``                        ``train.py`` (DOSnet-BV)
=====================  ==============================================  ==========================================  ==================================================
``--multi_adsorbate``  0/1: 4th input, the gas-phase adsorbate DOS     same                                        none (a structure vector instead: params ``fusion``)
``--data_dir``         pickle stream, default ``CH_data``              same (no default; params ``data_file``)     ``--data`` / params ``data_file`` (a data_prep h5)
``--run_mode``         0 train/test, 1 5-fold CV                       same                                        default single run; ``--cv [K]`` (grouped by material)
``--split_ratio``      test fraction, 0.2                              same                                        params ``split`` (stored split or fractions)
``--epochs``           60                                              same                                        ``--epochs`` / params ``epochs`` (early stopping too)
``--batch_size``       32                                              same                                        params ``batch_size``
``--channels``         9                                               same                                        params ``channels``
``--seed``             0 = random; seeds the CV shuffle (KFold);       default 88, 0 = random as upstream; CV      ``--seed``: initialisation and batch order only;
                       the train/test split is fixed (88)              shuffle + initialisation; split fixed 88   split and CV folds use ``split_seed`` (88)
``--save_model``       0/1: ``DOSnet_saved.h5`` in the cwd             RUN/``model.keras`` + ``scalers.npz``       always: RUN/``model.keras`` + ``scalers.json``
``--load_model``       0/1: load ``DOSnet_saved.h5``, recompile and    same, from ``--model_dir RUN`` (its         ``--predict RUN`` (predictions only);
                       go on training (single adsorbate only)          scalers reused; both model kinds)           ``--importance RUN``
(always)               TensorBoard logs in ``logs/<time>``             ``--tensorboard`` (RUN/tensorboard)         ``--tensorboard`` (RUN/tensorboard)
(always)               ``model.summary()`` printed                     printed (run mode 0)                        written to RUN/train.log
(none)                 outputs in the current directory                ``--out RUN``                               ``--out RUN``
=====================  ==============================================  ==========================================  ==================================================

Upstream cannot be read back by Keras 3 as saved (``DOSnet_saved.h5``, Keras 2 HDF5): see
``DOSnet.protocol.load_saved``. Other deviations: ``patches/README.md``.
"""
