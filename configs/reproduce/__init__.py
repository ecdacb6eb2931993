"""One config per published claim (experiments/reproduce.py); quick.py runs them all."""
