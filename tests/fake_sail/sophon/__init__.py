"""FAKE `sophon` package for tests. NOT Sophgo's SDK: see sail.py."""
