//! The reliability suite: every failure a production mesh meets, with real `meshbridge`
//! binaries and real Envoys, and traffic flowing through them for the whole scenario. Each
//! test states what may fail (nothing, unless it says otherwise) and asserts that nothing else
//! does: the requests' results are recorded and a failure is printed with its reason; the
//! time to recover is printed (`--nocapture`) and bounded by a constant the test names.

mod churn;
mod consul;
