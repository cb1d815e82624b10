"""``python -m lesiondiffusion CMD ...`` is the ``lesiondiffusion`` command (what ``torchrun -m`` starts)."""

from lesiondiffusion_tools.cli import main

if __name__ == "__main__":
    main()
