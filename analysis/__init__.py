"""Analysis of trained models: exact Hessian operators and eigen-solvers, landscapes, reports."""
