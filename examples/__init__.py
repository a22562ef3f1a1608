"""Runnable examples, installed as `keras_distill.examples`.

Each script has a `main(argv)` that the `keras-distill` command calls; copy a
script to start a project of your own.
"""
