"""``python -m hf_dpo`` (and ``accelerate launch -m hf_dpo``): the ``hf-dpo`` command."""

from hf_dpo.cli import command

if __name__ == "__main__":
    command()
