"""Classification with frozen models: an encoder with a deep/soft prompt and a head, or a causal LM
with label words (a verbalizer). See model.py for the two classifiers, objective.py for the loss and
metrics the training loop uses; saving and loading are in softprompt/io/classifier.py, the CLI jobs
in softprompt/runs/classify.py."""

from softprompt.classify.data import ClassificationData, parse_labels, read_classification, tokenize_classification
from softprompt.classify.model import HEAD_ONLY, Classifier, EncoderClassifier, VerbalizerClassifier
from softprompt.classify.objective import ClassificationObjective, accuracy_f1, predict

__all__ = ["Classifier", "EncoderClassifier", "VerbalizerClassifier", "HEAD_ONLY", "ClassificationObjective",
           "ClassificationData", "accuracy_f1", "predict", "parse_labels", "read_classification",
           "tokenize_classification"]
