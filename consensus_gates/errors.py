"""Errors raised for a user's mistake, each with a message that says what to do."""


class TracingError(RuntimeError):
    """torch.fx could not trace the model."""


class InputError(ValueError):
    """The example inputs do not fit the model."""


class ModelFileError(ValueError):
    """A saved file is corrupt, truncated, of another format, or does not match its model."""


class DataError(FileNotFoundError):
    """A data set is missing or not in the expected layout."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class CompilerNotFound(RuntimeError):
    """AOTInductor was asked for, and there is no C++ compiler to run."""
