"""Zero-shot and transfer experiments on `animal_silhouettes`, from the quick start."""
