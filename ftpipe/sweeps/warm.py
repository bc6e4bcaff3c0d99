"""What a trial imports, imported once by the trial server (ftpipe.sweeps.starter preloads this
module there; nothing else imports it). torch runs on one thread while importing: a GNU OpenMP
thread pool made here would not survive the fork into a trial."""
import torch

torch.set_num_threads(1)

import optuna  # noqa: E402,F401
import peft  # noqa: E402,F401
import transformers  # noqa: E402,F401

import ftpipe.evaluation.scoring  # noqa: E402,F401
import ftpipe.sweeps.trial  # noqa: E402,F401
import ftpipe.training.launch  # noqa: E402,F401
import ftpipe.training.recipe  # noqa: E402,F401
