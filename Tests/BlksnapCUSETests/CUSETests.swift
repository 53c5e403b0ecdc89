import Testing
@testable import BlksnapCUSE
