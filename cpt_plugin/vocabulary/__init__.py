"""New vocabulary done right: extension with a sound initialisation, healing of rows the base never
trained, and the record of which embedding rows are "fresh" (so the optimizer can give them their own
learning rate). See fresh_rows.py for the record every part shares."""
