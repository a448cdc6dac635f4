//! A valid component for a world that is not flowhost's: must be rejected at load.
wit_bindgen::generate!({ path: "wit", world: "calculator" });
struct Calc;
impl Guest for Calc {
    fn add(a: u32, b: u32) -> u32 {
        a + b
    }
}
export!(Calc);
