"""inat_classifier: the support code of the training, evaluation and sweep scripts at the repository root.

The package never imports those root files (tests/test_layout.py checks it); they import it.
"""
