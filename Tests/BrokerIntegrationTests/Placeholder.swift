import Testing
@Test func placeholderIntegration() {}
