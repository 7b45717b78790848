"""Sub-commands of the ``diffusers-cir`` command line (see ``diffusers_cir.cli``)."""
