"""Classification with frozen models: an encoder with a deep/soft prompt and a head, or a causal LM
with label words (a verbalizer). See model.py for the two classifiers, objective.py for the loss and
metrics the training loop uses, artifact.py for saving and loading, runs.py for the CLI jobs."""

from .artifact import classify_texts, is_classifier_card, load_classifier, render
from .data import ClassificationData, parse_labels, read_classification, tokenize_classification
from .model import HEAD_ONLY, Classifier, EncoderClassifier, VerbalizerClassifier
from .objective import ClassificationObjective, accuracy_f1, predict

__all__ = ["Classifier", "EncoderClassifier", "VerbalizerClassifier", "HEAD_ONLY", "ClassificationObjective",
           "ClassificationData", "accuracy_f1", "predict", "load_classifier", "classify_texts",
           "is_classifier_card", "render", "parse_labels", "read_classification", "tokenize_classification"]
