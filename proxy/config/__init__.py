"""routes.yaml as typed, frozen data: its loading, validation, reload and bind guard."""
