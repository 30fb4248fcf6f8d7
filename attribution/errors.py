"""User-facing errors of the attribution layer: the message names the input and what was expected."""


class AttributionError(ValueError):
    """A problem with a model, concept or option that the user can fix; printed without a traceback."""


class ModelError(AttributionError):
    """The model cannot be found, loaded, or is of an unsupported architecture."""


class ConceptError(AttributionError):
    """A concept file or a concept's target words are invalid for this model."""
