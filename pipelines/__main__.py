"""`python -m temper`: the command line (also what `accelerate launch -m temper` runs per rank)."""

from .cli import app

app(prog_name="temper")
