"""What the wire protocol's messages are made of, torch-free and frame-free: the parameter groups
by name, the objectives' names and weights, the model config, the site layout's names, task specs
as the server sends them, the report floors, the DP policy's wire form, the token settings and the
vocabulary. The protocol (healthfm_core/protocol/) imports these and the floor below them alone;
the model, the data code and the privacy code import their definitions from here."""
