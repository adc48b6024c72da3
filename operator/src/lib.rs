//! warren-operator
