"""The site's process supervision: `join` and the processes it runs (the SuperNode, the app guard,
the warm ClientApp), bundle approval, and every change to Flower's code on the site's side. The
learning code these run (the ClientApp, the site runtime) is the `client` package's top level."""
