"""Stochastic-gradient Markov chain Monte Carlo."""

from posteriors_fast.sgmcmc import sghmc, sgld, sgnht

__all__ = ["sgld", "sghmc", "sgnht"]
