"""``mmcl sweep``: a grid of experiments (a base config plus axes) run as separate ``mmcl run`` processes.

- :mod:`mmcl.sweep.spec`: the sweep file (strict keys), its expansion into runs with stable names, the
  per-run settings and command line, and the check of every run's config before anything starts;
- :mod:`mmcl.sweep.state`: what a run dir already holds (done, partial, not started, another config);
- :mod:`mmcl.sweep.launch`: the per-run command, log files and the final table, shared by the launchers;
- :mod:`mmcl.sweep.local`: N runs at once on this machine; :mod:`mmcl.sweep.slurm`: one submitit job per run;
- :mod:`mmcl.sweep.child`: the process a run is (``mmcl run``, with SIGTERM handled as Ctrl-C);
- :mod:`mmcl.sweep.command`: the ``mmcl sweep`` subcommand.

Nothing here imports torch: the SLURM job process unpickles :class:`mmcl.sweep.slurm.SweepJob` and only
starts the run's own process."""
